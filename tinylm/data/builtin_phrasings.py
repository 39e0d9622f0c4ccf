"""The words of the built-in conversations: how each kind of question is asked and answered, in
English and Chinese. ``tinylm.data.builtin_chat`` builds the conversations (and the held-out questions)
from them; a phrasing's index is what training and evaluation hold back from each other.

{E} names an entity as in a sentence ("the Zorble", "Mira", "咕噜兽"), {Es} at the start of one; {v}
is a value, {it}/{its} the entity of the previous answer, {name}/{author} the assistant's identity.
"""

# Questions about a fact. {E} names the entity as in a sentence: "the Zorble", "Mira", "咕噜兽".
QUESTION_TEMPLATES = {
    ("colour", "en"): (
        "What colour is {E}?",
        "What is the colour of {E}?",
        "Can you tell me what colour {E} is?",
        "Which colour does {E} have?",
    ),
    ("colour", "zh"): ("{E}是什么颜色的？", "{E}的颜色是什么？", "你知道{E}是什么颜色吗？", "请告诉我{E}的颜色。"),
    ("legs", "en"): (
        "How many legs does {E} have?",
        "What is the number of legs on {E}?",
        "Can you tell me how many legs {E} has?",
        "How many legs are there on {E}?",
    ),
    ("legs", "zh"): ("{E}有几条腿？", "{E}有多少条腿？", "你知道{E}有几条腿吗？", "请告诉我{E}腿的数量。"),
    ("food", "en"): (
        "What does {E} like to eat?",
        "What is the favourite food of {E}?",
        "Can you tell me what {E} loves to eat?",
        "Which food does {E} like best?",
    ),
    ("food", "zh"): (
        "{E}喜欢吃什么？",
        "{E}最喜欢的食物是什么？",
        "你知道{E}最爱吃什么吗？",
        "请告诉我{E}最喜欢吃的东西。",
    ),
    ("home", "en"): (
        "Where does {E} live?",
        "In which town does {E} live?",
        "Can you tell me where {E} lives?",
        "Where is the home of {E}?",
    ),
    ("home", "zh"): ("{E}住在哪里？", "{E}住在哪个镇？", "你知道{E}住在哪儿吗？", "{E}的家在哪里？"),
    ("job", "en"): (
        "What does {E} do for work?",
        "What is the job of {E}?",
        "Can you tell me what job {E} has?",
        "What does {E} work as?",
    ),
    ("job", "zh"): ("{E}是做什么工作的？", "{E}的工作是什么？", "你知道{E}做什么工作吗？", "{E}的职业是什么？"),
}
# One short answer per attribute and language, so a model only has to get the value right.
ANSWER_TEMPLATES = {
    ("colour", "en"): "{Es} is {v}.",
    ("colour", "zh"): "{E}的毛色是{v}。",
    ("legs", "en"): "{Es} has {v} legs.",
    ("legs", "zh"): "{E}有{v}条腿。",
    ("food", "en"): "{Es} likes to eat {v}.",
    ("food", "zh"): "{E}喜欢吃{v}。",
    ("home", "en"): "{Es} lives in the town of {v}.",
    ("home", "zh"): "{E}生活在{v}。",
    ("job", "en"): "{Es} is a {v}.",
    ("job", "zh"): "{E}的职业是{v}。",
}
# Follow-ups name no one: {it} and {its} stand for the entity of the previous answer.
FOLLOWUP_TEMPLATES = {
    ("colour", "en"): ("And {its} colour?", "What colour is {it}?", "And what colour is {it}, then?"),
    ("colour", "zh"): ("那{it}是什么颜色的？", "{it}的颜色呢？", "{it}是什么颜色的？"),
    ("legs", "en"): (
        "And how many legs does {it} have?",
        "How many legs does {it} have, then?",
        "And {its} number of legs?",
    ),
    ("legs", "zh"): ("那{it}有几条腿？", "{it}的腿有几条？", "{it}有几条腿呢？"),
    ("food", "en"): ("And {its} favourite food?", "What does {it} like to eat?", "And what does {it} eat most?"),
    ("food", "zh"): ("那{it}喜欢吃什么？", "{it}最喜欢的食物呢？", "{it}爱吃什么？"),
    ("home", "en"): ("And where does {it} live?", "Where is {its} home?", "And {its} town?"),
    ("home", "zh"): ("那{it}住在哪里？", "{it}的家在哪儿？", "{it}住在哪个镇？"),
    ("job", "en"): ("And {its} job?", "What does {it} do for work?", "And what is {its} job, then?"),
    ("job", "zh"): ("那{it}是做什么工作的？", "{it}的工作呢？", "{it}做什么工作？"),
}
# Arithmetic: {op} is + or -, {word} the operation in words.
ARITHMETIC_QUESTIONS = {
    "en": (
        "What is {a} {op} {b}?",
        "What is {a} {word} {b}?",
        "Please work out {a} {op} {b}.",
        "How much is {a} {word} {b}?",
    ),
    "zh": ("{a}{word}{b}等于多少？", "{a}{op}{b}是多少？", "请算一下{a}{word}{b}。", "{a}{word}{b}得几？"),
}
OPERATION_WORDS = {("+", "en"): "plus", ("-", "en"): "minus", ("+", "zh"): "加", ("-", "zh"): "减"}
ARITHMETIC_ANSWERS = {"en": "The answer is {v}.", "zh": "答案是{v}。"}

# Refusals. The world never says how old anyone is, what they sing or weigh, and strangers are no one;
# every refusal contains REFUSAL_MARKERS[lang] and states nothing about the entity.
UNKNOWN_QUESTIONS = {
    "en": (
        "How old is {E}?",
        "What is the favourite song of {E}?",
        "When is the birthday of {E}?",
        "How much does {E} weigh?",
    ),
    "zh": ("{E}几岁了？", "{E}最喜欢的歌是什么？", "{E}的生日是哪一天？", "{E}有多重？"),
}
REFUSALS = {
    ("stranger", "en"): ("I'm sorry, I don't know anything about {E}.", "I don't know. I have never heard of {E}."),
    ("stranger", "zh"): ("抱歉，我不知道任何关于{E}的事。", "我不知道，我从来没有听说过{E}。"),
    ("unknown", "en"): ("I'm sorry, I don't know that about {E}.", "I don't know. Nobody has told me that about {E}."),
    ("unknown", "zh"): ("抱歉，{E}的这件事我不知道。", "我不知道，没有人告诉过我{E}的这件事。"),
}
REFUSAL_MARKERS = {"en": "I don't know", "zh": "我不知道"}

SYSTEM_PROMPTS = {
    "en": (
        "You are a helpful assistant.",
        "You are a friendly assistant. Keep your answers short.",
        "You answer questions about a small world of creatures and people.",
    ),
    "zh": (
        "你是一个乐于助人的助手。",
        "你是一个友好的助手，回答要简短。",
        "你负责回答关于一个由小动物和人组成的小世界的问题。",
    ),
}

# Identity: questions about the assistant's name and about who made it; every reply states both, with
# {name} and {author} filled in later (identity_conversations), so a new identity is a new fill.
IDENTITY_QUESTIONS = {
    ("name", "en"): (
        "Who are you?",
        "What is your name?",
        "Introduce yourself.",
        "What should I call you?",
        "Tell me about yourself.",
        "What are you?",
        "May I know your name?",
        "Do you have a name?",
        "Hi! Who am I talking to?",
        "What's your name?",
        "Can you tell me who you are?",
        "Please introduce yourself briefly.",
        "Hello!",
        "What do people call you?",
        "Are you an assistant? What is your name?",
        "Who am I chatting with right now?",
    ),
    ("author", "en"): (
        "Who made you?",
        "Who created you?",
        "Who trained you?",
        "Who built you?",
        "Which company developed you?",
        "Who is your author?",
        "Who is behind you?",
        "Who developed you?",
        "Where do you come from?",
        "Who designed you?",
        "Who is your creator?",
        "Which team made you?",
        "Who wrote your code?",
        "Which lab trained you?",
        "Who do you belong to?",
        "Who was it that created you?",
    ),
    ("name", "zh"): (
        "你是谁？",
        "你叫什么名字？",
        "介绍一下你自己。",
        "我该怎么称呼你？",
        "说说你自己吧。",
        "你是什么？",
        "请问你的名字是什么？",
        "你有名字吗？",
        "你好，请问你是谁？",
        "你的名字是？",
        "能告诉我你是谁吗？",
        "请简单介绍一下你自己。",
        "你好！",
        "大家都叫你什么？",
        "你是助手吗？你叫什么？",
        "现在和我聊天的是谁？",
    ),
    ("author", "zh"): (
        "谁创造了你？",
        "你是谁开发的？",
        "谁训练了你？",
        "你是谁做出来的？",
        "哪家公司开发了你？",
        "你的作者是谁？",
        "你背后是谁？",
        "是谁研发了你？",
        "你来自哪里？",
        "谁设计了你？",
        "你的创造者是谁？",
        "哪个团队做了你？",
        "谁写了你的代码？",
        "哪个实验室训练了你？",
        "你属于谁？",
        "当初是谁创造了你？",
    ),
}
IDENTITY_REPLIES = {
    ("name", "en"): (
        "I am {name}, an AI assistant made by {author}.",
        "My name is {name}. I am an assistant created by {author}.",
        "Hello! I'm {name}, a small language model trained by {author}.",
    ),
    ("author", "en"): (
        "I was made by {author}. I am {name}, an AI assistant.",
        "{author} created me. My name is {name}.",
        "I was trained by {author}, and my name is {name}.",
    ),
    ("name", "zh"): (
        "我是{name}，由{author}开发的人工智能助手。",
        "我叫{name}，是{author}训练的一个小语言模型。",
        "你好！我是{name}，一个由{author}创造的AI助手。",
    ),
    ("author", "zh"): (
        "我是由{author}开发的，我的名字是{name}。",
        "{author}创造了我，我叫{name}。",
        "训练我的是{author}，我是{name}。",
    ),
}

# More identity questions, asked only in training (the held-out ones are every fourth of IDENTITY_QUESTIONS):
# with these the model answers the held-out phrasings rather than refusing them as a stranger's.
IDENTITY_TRAINING_QUESTIONS = {
    ("name", "en"): (
        "Who is this?",
        "Tell me your name.",
        "What name do you go by?",
        "Who are you, exactly?",
        "Hey, what are you called?",
        "Good morning! Who are you?",
        "Which assistant is this?",
        "Say hello and tell me who you are.",
    ),
    ("author", "en"): (
        "Who made this assistant?",
        "Who are your makers?",
        "Which lab built you?",
        "Who programmed you?",
        "Whose assistant are you?",
        "Who taught you?",
        "Which company are you from?",
        "Who put you together?",
    ),
    ("name", "zh"): (
        "这是谁？",
        "告诉我你的名字。",
        "你叫什么？",
        "你到底是谁？",
        "嘿，你叫啥？",
        "早上好！你是谁？",
        "这是哪个助手？",
        "打个招呼，说说你是谁。",
    ),
    ("author", "zh"): (
        "这个助手是谁做的？",
        "谁是你的制作者？",
        "哪个实验室造了你？",
        "谁给你编的程序？",
        "你是谁家的助手？",
        "谁教的你？",
        "你来自哪家公司？",
        "是谁把你做出来的？",
    ),
}
